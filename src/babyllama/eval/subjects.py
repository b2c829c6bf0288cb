"""The subjects of C-Eval and CMMLU: each one's Chinese title (it goes into the prompt's opening
line, as in lm-evaluation-harness's `ceval-valid` and `cmmlu` tasks) and its category.

Categories are each benchmark's own: C-Eval's four (from its subject mapping), and CMMLU's four
from its subcategory table; CMMLU also groups 15 subjects as "China specific" across them.
A subject not listed here (a renamed file, a user's own) gets its file name as title and "Other".
"""

# the first line of every prompt, before the shots: each benchmark's wording, as the harness writes it
CEVAL_DESCRIPTION = "以下是中国关于{title}的单项选择题，请选出其中的正确答案。\n\n"
CMMLU_DESCRIPTION = "以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n"

CATEGORIES = ("STEM", "Humanities", "Social Science", "Other")

CEVAL = {
    # STEM
    'computer_network': ('计算机网络', 'STEM'),
    'operating_system': ('操作系统', 'STEM'),
    'computer_architecture': ('计算机组成', 'STEM'),
    'college_programming': ('大学编程', 'STEM'),
    'college_physics': ('大学物理', 'STEM'),
    'college_chemistry': ('大学化学', 'STEM'),
    'advanced_mathematics': ('高等数学', 'STEM'),
    'probability_and_statistics': ('概率统计', 'STEM'),
    'discrete_mathematics': ('离散数学', 'STEM'),
    'electrical_engineer': ('注册电气工程师', 'STEM'),
    'metrology_engineer': ('注册计量师', 'STEM'),
    'high_school_mathematics': ('高中数学', 'STEM'),
    'high_school_physics': ('高中物理', 'STEM'),
    'high_school_chemistry': ('高中化学', 'STEM'),
    'high_school_biology': ('高中生物', 'STEM'),
    'middle_school_mathematics': ('初中数学', 'STEM'),
    'middle_school_biology': ('初中生物', 'STEM'),
    'middle_school_physics': ('初中物理', 'STEM'),
    'middle_school_chemistry': ('初中化学', 'STEM'),
    'veterinary_medicine': ('兽医学', 'STEM'),
    # Humanities
    'modern_chinese_history': ('近代史纲要', 'Humanities'),
    'ideological_and_moral_cultivation': ('思想道德修养与法律基础', 'Humanities'),
    'logic': ('逻辑学', 'Humanities'),
    'law': ('法学', 'Humanities'),
    'chinese_language_and_literature': ('中国语言文学', 'Humanities'),
    'art_studies': ('艺术学', 'Humanities'),
    'professional_tour_guide': ('导游资格', 'Humanities'),
    'legal_professional': ('法律职业资格', 'Humanities'),
    'high_school_chinese': ('高中语文', 'Humanities'),
    'high_school_history': ('高中历史', 'Humanities'),
    'middle_school_history': ('初中历史', 'Humanities'),
    # Social Science
    'college_economics': ('大学经济学', 'Social Science'),
    'business_administration': ('工商管理', 'Social Science'),
    'marxism': ('马克思主义基本原理', 'Social Science'),
    'mao_zedong_thought': ('毛泽东思想和中国特色社会主义理论体系概论', 'Social Science'),
    'education_science': ('教育学', 'Social Science'),
    'teacher_qualification': ('教师资格', 'Social Science'),
    'high_school_politics': ('高中政治', 'Social Science'),
    'high_school_geography': ('高中地理', 'Social Science'),
    'middle_school_politics': ('初中政治', 'Social Science'),
    'middle_school_geography': ('初中地理', 'Social Science'),
    # Other
    'civil_servant': ('公务员', 'Other'),
    'sports_science': ('体育学', 'Other'),
    'plant_protection': ('植物保护', 'Other'),
    'basic_medicine': ('基础医学', 'Other'),
    'clinical_medicine': ('临床医学', 'Other'),
    'urban_and_rural_planner': ('注册城乡规划师', 'Other'),
    'accountant': ('注册会计师', 'Other'),
    'fire_engineer': ('注册消防工程师', 'Other'),
    'environmental_impact_assessment_engineer': ('环境影响评价工程师', 'Other'),
    'tax_accountant': ('税务师', 'Other'),
    'physician': ('医师资格', 'Other'),
}

CMMLU = {
    # STEM
    'anatomy': ('解剖学', 'STEM'),
    'astronomy': ('天文学', 'STEM'),
    'college_actuarial_science': ('大学精算学', 'STEM'),
    'college_engineering_hydrology': ('大学工程水文学', 'STEM'),
    'college_mathematics': ('大学数学', 'STEM'),
    'college_medical_statistics': ('大学医学统计', 'STEM'),
    'computer_science': ('计算机科学', 'STEM'),
    'conceptual_physics': ('概念物理学', 'STEM'),
    'electrical_engineering': ('电气工程', 'STEM'),
    'elementary_mathematics': ('初等数学', 'STEM'),
    'genetics': ('遗传学', 'STEM'),
    'high_school_biology': ('高中生物', 'STEM'),
    'high_school_chemistry': ('高中化学', 'STEM'),
    'high_school_mathematics': ('高中数学', 'STEM'),
    'high_school_physics': ('高中物理学', 'STEM'),
    'machine_learning': ('机器学习', 'STEM'),
    'virology': ('病毒学', 'STEM'),
    # Humanities
    'arts': ('艺术学', 'Humanities'),
    'chinese_history': ('中国历史', 'Humanities'),
    'chinese_literature': ('中国文学', 'Humanities'),
    'college_law': ('大学法律', 'Humanities'),
    'global_facts': ('全球事实', 'Humanities'),
    'international_law': ('国际法学', 'Humanities'),
    'jurisprudence': ('法理学', 'Humanities'),
    'logical': ('逻辑学', 'Humanities'),
    'marxist_theory': ('马克思主义理论', 'Humanities'),
    'philosophy': ('哲学', 'Humanities'),
    'professional_law': ('专业法学', 'Humanities'),
    'world_history': ('世界历史', 'Humanities'),
    'world_religions': ('世界宗教', 'Humanities'),
    # Social Science
    'ancient_chinese': ('古汉语', 'Social Science'),
    'business_ethics': ('商业伦理', 'Social Science'),
    'chinese_civil_service_exam': ('中国公务员考试', 'Social Science'),
    'chinese_food_culture': ('中国饮食文化', 'Social Science'),
    'chinese_foreign_policy': ('中国外交政策', 'Social Science'),
    'chinese_teacher_qualification': ('中国教师资格', 'Social Science'),
    'college_education': ('大学教育学', 'Social Science'),
    'economics': ('经济学', 'Social Science'),
    'education': ('教育学', 'Social Science'),
    'elementary_chinese': ('小学语文', 'Social Science'),
    'ethnology': ('民族学', 'Social Science'),
    'high_school_geography': ('高中地理', 'Social Science'),
    'high_school_politics': ('高中政治', 'Social Science'),
    'journalism': ('新闻学', 'Social Science'),
    'management': ('管理学', 'Social Science'),
    'marketing': ('市场营销', 'Social Science'),
    'modern_chinese': ('现代汉语', 'Social Science'),
    'professional_accounting': ('专业会计', 'Social Science'),
    'professional_psychology': ('专业心理学', 'Social Science'),
    'public_relations': ('公共关系', 'Social Science'),
    'security_study': ('安全研究', 'Social Science'),
    'sociology': ('社会学', 'Social Science'),
    # Other
    'agronomy': ('农学', 'Other'),
    'chinese_driving_rule': ('中国驾驶规则', 'Other'),
    'clinical_knowledge': ('临床知识', 'Other'),
    'college_medicine': ('大学医学', 'Other'),
    'computer_security': ('计算机安全', 'Other'),
    'construction_project_management': ('建设工程管理', 'Other'),
    'elementary_commonsense': ('小学常识', 'Other'),
    'elementary_information_and_technology': ('小学信息技术', 'Other'),
    'food_science': ('食品科学', 'Other'),
    'human_sexuality': ('人类性行为', 'Other'),
    'legal_and_moral_basis': ('法律与道德基础', 'Other'),
    'nutrition': ('营养学', 'Other'),
    'professional_medicine': ('专业医学', 'Other'),
    'sports_science': ('体育学', 'Other'),
    'traditional_chinese_medicine': ('中医中药', 'Other'),
}

# CMMLU's fifth group, across the four categories
CMMLU_CHINA_SPECIFIC = frozenset({'ancient_chinese', 'chinese_civil_service_exam', 'chinese_driving_rule', 'chinese_food_culture', 'chinese_foreign_policy', 'chinese_history', 'chinese_literature', 'chinese_teacher_qualification', 'construction_project_management', 'elementary_chinese', 'elementary_commonsense', 'ethnology', 'high_school_politics', 'modern_chinese', 'traditional_chinese_medicine'})
